"""Parameter values that broke out of the old quote-and-paste command rendering (issue 12,
item 5), and their neighbours: shell syntax, quotes, globs, options, whitespace, unicode."""

HOSTILE = [
    "; touch PWNED", "$(touch PWNED)", "`touch PWNED`", "a\ntouch PWNED", "'; touch PWNED; '",
    '"; touch PWNED; "', "it's", 'say "hi"', "*", "?", "[a-z]*", "~", "~root", "--option", "-rf", "-",
    "--output=/etc/passwd", "a b  c", " leading", "trailing ", "", "\t", "$HOME", "${IFS}", "$((1+1))",
    "\\", "\\'", "a\\\"b", "{{ x }}", "{% if 1 %}", "#comment", "&& touch PWNED", "| tee PWNED", "> PWNED",
    "< /etc/passwd", "$'\\x41'", "résumé ✓ 東京 \u202e", "\r\n", "!", "%s%n", "\x7f\x01",
]

# The right form a refused template's message shows for handing a value to a shell.
RIGHT_FORM = "sh -c 'sleep \"$1\"' sh {{ x }}"
