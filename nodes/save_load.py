"""SaveInversion / LoadInversion: an inverted LATENT, record and all, in one file (``host/files.py``)."""

import json
import os

import folder_paths
import safetensors.torch
from comfy.cli_args import args
from comfy_api.latest import io, ui

from .host import files
from .host.inputs import fail
from .host.record import Record


class SaveInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_SaveInversion",
            display_name="Save Inversion",
            category="sampling/inversion",
            description="Saves an inverted LATENT with everything Invert recorded (schedule, method, settings, "
                        "pair, trajectory, source, residuals, model) to one .safetensors file in the output "
                        "folder, so Reconstruct and the editors can resume it later without inverting again. "
                        "Move the file to the input folder to load it with LoadInversion.",
            inputs=[
                io.Latent.Input("latent", tooltip="The output of Invert (a plain latent is refused: use SaveLatent)."),
                io.String.Input("filename_prefix", default="inversions/InversionSuite",
                                tooltip="File name start, relative to the output folder; a counter and "
                                        "'_.safetensors' are appended, as SaveLatent does."),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent, filename_prefix):
        Record.read("SaveInversion", latent, "latent", hint=files.PLAIN)  # every field, without a model
        tensors, content = files.encode("SaveInversion", latent)
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory())
        meta = {files.VERSION_KEY: str(files.FILE_FORMAT), files.CONTENT_KEY: content}
        hidden = cls.hidden  # None when called outside an executing graph
        if not args.disable_metadata and getattr(hidden, "prompt", None) is not None:
            # The graph that made it, as SaveLatent stores it, so a shared file can be traced.
            meta["prompt"] = json.dumps(hidden.prompt)
            for k, v in (hidden.extra_pnginfo or {}).items():
                meta.setdefault(k, json.dumps(v))
        # What safetensors writes: the metadata plus about a hundred bytes per tensor entry.
        size = sum(len(k) + len(v) for k, v in meta.items()) + 200 * (len(tensors) + 1)
        if size > files.MAX_HEADER:
            fail("SaveInversion", "latent", f"its file header would be about {size} bytes, more than LoadInversion "
                                            f"reads ({files.MAX_HEADER}); with a very large workflow, run ComfyUI with "
                                            "--disable-metadata")
        file = f"{name}_{counter:05}_{files.EXTENSION}"
        os.makedirs(folder, exist_ok=True)
        safetensors.torch.save_file(tensors, os.path.join(folder, file), metadata=meta)
        return io.NodeOutput(ui={"latents": [ui.SavedResult(file, subfolder, io.FolderType.output)]})


class LoadInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InversionSuite_LoadInversion",
            display_name="Load Inversion",
            category="sampling/inversion",
            description="Loads an inversion saved by SaveInversion from the input folder and checks it against "
                        "the model: the LATENT comes back bit for bit, ready for Reconstruct and the editors. "
                        "Refuses, before any model call, files outside the input folder (links followed), plain "
                        "latents, damaged files or records, files from a newer version and inversions made "
                        "with a different kind of model.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion will be used with; it must be the kind "
                                                "of model that made it (prediction type and latent format)."),
                # The host uploads only images, video and audio from a combo: the pack's web/js adds the
                # upload button. An empty folder offers "none" (an empty list shows "undefined").
                io.Combo.Input("inversion", options=files.input_files() or ["none"],
                               tooltip="A .safetensors file from Save Inversion, in the input folder; 'choose "
                                       "inversion to upload' copies one there. 'none': the folder has none yet."),
            ],
            outputs=[io.Latent.Output(display_name="inverted",
                                      tooltip="The saved inverted LATENT with its inversion record.")],
        )

    @classmethod
    def execute(cls, model, inversion):
        node = "LoadInversion"
        latent = files.read(node, "inversion", inversion, model)
        Record.read(node, latent, "inversion", model, files.DAMAGED)  # every check Reconstruct and the editors make
        files.check_extras(node, latent)
        return io.NodeOutput(latent)

    @classmethod
    def fingerprint_inputs(cls, inversion, model=None):
        # Re-run when the file changes.
        return files.fingerprint(inversion)

    @classmethod
    def validate_inputs(cls, inversion):
        # The host skips its own file-list check when this exists, so this check is the strict one.
        if files.resolve(inversion) is None:
            return f"LoadInversion: input 'inversion': {files.nowhere(inversion)}"
        return True
