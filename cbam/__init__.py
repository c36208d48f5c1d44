"""cbam-ablate: measured ablations of CBAM and its proposed improvements."""
