"""ComfyUI-UniRef: the ComfyUI entry point (V3 API). Nothing runs at import time."""


def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes import comfy_model, examples
    from .nodes.native_nodes import NODES as NATIVE_NODES
    from .nodes.uniref_nodes import NODES

    class UniRefExtension(ComfyExtension):
        async def get_node_list(self):
            # Called once at start-up by every host (on_load is not called by ComfyUI 0.3.x).
            comfy_model.register_model_folder()
            examples.install_example_images()
            return [*NODES, *NATIVE_NODES]

    return UniRefExtension()
