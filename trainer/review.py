"""Step 3's mask review: a forget image in ``gr.ImageEditor`` with its mask as a paintable layer.

*Show* loads image k of the run's data (the decoded copy in ``<run>/review/``, enlarged so a
brush can be aimed); *Save mask* turns every painted pixel of the layer into the mask and writes
it into the run's data cache, which training reads; *Remove image* drops the image. The data
itself is :mod:`trainer.runs`' business; these are the page's handlers (mixed into
:class:`trainer.app.TrainerApp`, which provides ``run_dir``).
"""

from __future__ import annotations

from erasekit.errors import ErasekitError
from trainer import runs
from trainer.words import page_words


class ReviewHandlers:
    REVIEW_SIZE = 256  # the editor shows small images enlarged (nearest) so that a brush can be aimed

    def _editor_value(self, run_dir, index):
        import numpy as np

        image, mask, prompt, n = runs.forget_for_review(run_dir, index)
        k = max(1, self.REVIEW_SIZE // max(image.shape[:2]))
        image = image.repeat(k, 0).repeat(k, 1)
        mask = mask.repeat(k, 0).repeat(k, 1)
        layer = np.zeros((*mask.shape, 4), np.uint8)
        layer[mask] = (255, 40, 40, 150)
        value = {"background": image, "layers": [layer], "composite": None}
        return value, (f"Image {int(index)} of {n}: *{prompt}*; the red layer is its mask ({mask.mean():.0%} of the image). "
                       "Paint to add, erase to remove, then **Save mask**.")

    def review_show(self, run_name, index):
        """The forget image ``index`` (1-based) of the run with its mask as a paintable layer."""
        import gradio as gr

        try:
            return self._editor_value(self.run_dir(run_name), index or 1)
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return gr.skip(), f"**Error:** {page_words(err)}"

    def review_save(self, run_name, index, editor):
        """The editor's layer (any painted pixel) becomes the mask of forget image ``index``."""
        import gradio as gr
        import numpy as np

        try:
            run_dir = self.run_dir(run_name)
            layers = (editor or {}).get("layers") or []
            if not layers or layers[0] is None:
                raise ErasekitError("There is no mask layer to save: press Show to load an image first.")
            layer = np.asarray(layers[0])
            mask = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else layer.reshape(layer.shape[:2]) > 0
            frac = runs.save_forget_mask(run_dir, index or 1, mask)
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return f"**Error:** {page_words(err)}"
        return (f"Saved the mask of image {int(index or 1)} ({frac:.0%} of the image). Training uses it as long as the "
                "data settings stay the same (changing them makes new data).")

    def review_remove(self, run_name, index):
        """Drop forget image ``index`` from the run's data; shows the image now at that place."""
        import gradio as gr

        try:
            run_dir = self.run_dir(run_name)
            left = runs.remove_forget_image(run_dir, index or 1)
            value, shown = self._editor_value(run_dir, min(int(index or 1), left))
        except ErasekitError as err:
            gr.Warning(page_words(err))
            return gr.skip(), gr.skip(), f"**Error:** {page_words(err)}"
        return value, min(int(index or 1), left), f"Removed image {int(index or 1)}; {left} remain. " + shown
