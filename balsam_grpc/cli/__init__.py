"""balsamctl: the command line."""
