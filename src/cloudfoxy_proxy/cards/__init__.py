"""In-process smart cards for the emulated backend."""
