"""Testing support (not shipped): brute-force references."""
