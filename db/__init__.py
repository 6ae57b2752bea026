"""The bottom layer: generic database helpers (``db.pg``), no clinical model inside."""
