"""Model folders (each self-contained so it can ship as Hub remote code)."""
