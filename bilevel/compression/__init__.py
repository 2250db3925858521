"""Making students: the channel-pruning engine, BK-SDM block removal, student I/O without pickle, model stats."""
