"""`balsamctl dashboard`: a live web view of the federation for one user.

The dashboard is a client of the server like any other (the SDK with the user's token;
it never touches the database): server-rendered pages (Starlette + Jinja2) read through
the API, and one Server-Sent Events stream per open page relays `WatchEvents`, coalesced
into short batches, so the browser updates rows and refetches the parts an event makes
stale instead of polling.

- `views`: pure: query-string parsing, state presentation, paging trails, chart series.
- `reads`: the API reads each page needs (one `Reader` per user).
- `live`: the event relay (upstream watch thread, coalescing, SSE framing).
- `app`: routes, templates, login and the CSRF/host guards; `serve`: uvicorn.
"""
