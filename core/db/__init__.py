"""Database layer: declarative models and engine/session factories (SQLAlchemy 2, async)."""
