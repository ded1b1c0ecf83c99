"""Expert training and the checkpoint format."""
