"""The control-plane server: gRPC servicers over the store. The only writer of state."""
