"""LightningDataModules, one per data family, reading the field's real formats."""
