"""Controllers: per-prototype gains and suppression, calibration and targeting."""
