"""gRPC servicers: validate requests, call the store, convert rows to messages."""
