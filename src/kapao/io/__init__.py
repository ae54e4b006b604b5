"""Input sources (images, folders, globs, videos, webcams) and atomic output writers."""
