"""Data staging at the site: the transfer service moves a job's stage-in and stage-out
items in batches through a backend chosen by the location's URL scheme (globus://,
file://, rsync://), remembers every task in a local journal before it is started, and
reports progress to the server on the site stream."""
