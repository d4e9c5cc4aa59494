"""The results store, its exports, the run view and phase detection."""
