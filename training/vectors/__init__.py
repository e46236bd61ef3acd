"""Emotion readout vectors: CAA fitting, the readout build, held-out validation and length calibration."""
