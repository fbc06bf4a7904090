"""Teacher sampling ("shaking"), the DORPO loss and collaborative training (issues 4-6)."""
