"""ComfyUI adapters for the UniRef engine: schemas, validation, one call into uniref_core each."""
