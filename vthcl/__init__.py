"""VTHCL: video representation learning with visual tempo consistency (the method and its training)."""
