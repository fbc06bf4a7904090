"""Layer-range serving and pipelined generation across peers (issue 7)."""
