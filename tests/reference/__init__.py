"""float64 references for lmkern's ops, written straight from the papers' formulas (never calling lmkern)."""
