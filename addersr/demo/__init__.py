"""The web demo's work with no user interface: ``app.py`` is its page, and a script or
another front end uses it the same way:

    from addersr.demo import Upscaler
    up = Upscaler("weights", device="cpu")  # the weights offered; each model loads once
    result = up.upscale("photo.png", progress=lambda done, total, what: print(what, done, total))
    print(result.output, f"{result.seconds:.2f} s", result.ops["mults"], "multiplications")
    # precision="int8" or "fp32"; by default int8 where the weights have an int8 calibration
    # a bad request raises Refused (its message is for the user); cancelled=f stops at a tile

``catalogue`` owns the weights on offer (labels, Set5 scores, the default model, twins),
``checks`` the limits and request checks (:class:`Refused`), ``service`` the
:class:`Upscaler` (caches, result folders, the upscale call) and its :class:`Result`.
Result files live in the Upscaler's temporary folder and go with it: copy what you keep.
"""

from addersr.demo.catalogue import Catalogue
from addersr.demo.checks import Refused, Request
from addersr.demo.service import Cancelled, Result, Upscaler

__all__ = ["Cancelled", "Catalogue", "Refused", "Request", "Result", "Upscaler"]
