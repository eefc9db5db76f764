"""The site daemon's entry points (what `balsamctl site ...` starts as processes).

    python -m balsam_grpc.site --site-dir DIR        run the daemon in the foreground
    python -m balsam_grpc.site init PATH [--platform NAME] [--name NAME] [--no-elastic]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from balsam_grpc.core.errors import BalsamError
from balsam_grpc.core.logging import configure_logging


def init_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m balsam_grpc.site init", description="Create a site.")
    p.add_argument("path", type=Path)
    p.add_argument("--platform", default="local")
    p.add_argument("--name", default="")
    p.add_argument("--no-elastic", action="store_true", help="leave the elastic queue off")
    a = p.parse_args(argv)
    from balsam_grpc.site.init import init_site
    from balsam_grpc.site.settings import load_settings

    layout = init_site(a.path, platform=a.platform, name=a.name, elastic=not a.no_elastic)
    s = load_settings(layout.settings_file)
    print(f"created site {s.name!r} (id {s.site_id}) at {layout.root} on platform {s.platform}, "
          f"scheduler {s.scheduler.name}")
    print(f"edit {layout.settings_file}, put apps in {layout.apps_dir}, then: balsamctl site start {layout.root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["init"]:
            return init_main(argv[1:])
        p = argparse.ArgumentParser(prog="python -m balsam_grpc.site", description="Run a balsam-grpc site daemon.")
        p.add_argument("--site-dir", required=True, type=Path,
                       help="the site directory (made by `balsamctl site init`)")
        a = p.parse_args(argv)
        configure_logging()
        from balsam_grpc.site.daemon import run_daemon

        run_daemon(a.site_dir)
    except BalsamError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except Exception as exc:  # a grpc error from init, for example: one line, not a traceback
        import grpc

        if isinstance(exc, grpc.RpcError):
            print(f"error: the server answered {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
