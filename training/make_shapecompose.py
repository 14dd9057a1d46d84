"""``python -m training.make_shapecompose --out …``: ShapeCompose manifests (`training.tasks.shapecompose.make`)."""

from .tasks.shapecompose.make import main

if __name__ == "__main__":
    raise SystemExit(main())
