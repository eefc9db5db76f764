"""Persistence: SQLAlchemy tables and transactional operations. Knows nothing of protobuf."""
