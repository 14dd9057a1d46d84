"""MSGRPO pieces: group advantages from many reward signals, the clipped-ratio loss, the config."""
