"""Training: the ShapeCompose task and its checker, SFT and MSGRPO trainers. Imports uniref_core, never nodes/."""
