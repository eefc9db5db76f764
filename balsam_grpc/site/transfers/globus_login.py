"""`python -m balsam_grpc.site.transfers.globus_login --site-dir DIR [--scope S]...`: log
the site in to Globus (run by `balsamctl site globus-login`, which may not import the
site package).

User login (a native app's client id in settings.yml): globus-sdk's command-line login
flow prints a URL, you paste back the code, and the tokens (with refresh tokens) go to
<site>/state/globus-tokens.json, where the daemon reads them. Client credentials (the
secret in the environment variable named by transfers.globus.client_secret_env): no
interaction; tokens are fetched and stored the same way. --scope adds the scopes a
ConsentRequired error asked for; --collection asks for a mapped collection's data_access.
--check only tells whether a login is needed (exit 0: logged in, 1: login needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from balsam_grpc.site.settings import SettingsError, load_settings
from balsam_grpc.site.transfers.backends.base import TransferFailed
from balsam_grpc.site.transfers.backends.globus import TOKEN_FILE, make_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="balsamctl site globus-login")
    parser.add_argument("--site-dir", type=Path, required=True)
    parser.add_argument("--scope", action="append", default=[], help="extra scope to consent to")
    parser.add_argument("--collection", action="append", default=[], help="collection needing data_access consent")
    parser.add_argument("--check", action="store_true", help="only report whether a login is needed")
    args = parser.parse_args(argv)
    site_dir = args.site_dir.resolve()
    try:
        settings = load_settings(site_dir / "settings.yml")
        globus = settings.transfers.globus
        if args.collection:
            globus = globus.model_copy(
                update={"data_access_collections": [*globus.data_access_collections, *args.collection]})
        app = make_app(site_dir, globus, interactive=not args.check, extra_scopes=args.scope)
    except (SettingsError, TransferFailed) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    needed = app.login_required()
    if args.check:
        print("Globus login needed" if needed else "Globus login valid")
        return 1 if needed else 0
    app.login(force=bool(args.scope or args.collection) or needed)
    print(f"Globus login stored in {site_dir / 'state' / TOKEN_FILE}; restart the daemon if transfers failed "
          "(then retry them with `balsamctl transfers retry`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
