"""``python -m training.checker IMAGE SPEC.json``: the ShapeCompose checker (`training.tasks.shapecompose.checker`)."""

from .tasks.shapecompose.checker import main

if __name__ == "__main__":
    raise SystemExit(main())
