"""The lab's guest disk image: a bootable Debian 12 built from Debian's packages by our code.

- `recipe`: what goes in (package lists, units, configuration) and the hash naming it
- `files/`: the guest-side files installed into the image (systemd units, scripts, configs);
  `@NAME@` in them is replaced by `layout.NAME`
- `layout`: the names the lab and the image share (paths, sockets, users, fw_cfg entries)
- `build`: `ensure_guest_image() -> GuestImage(path, kernel_release, recipe_hash)`, cached in
  /var/cache/stillpoint-lab/guest-image/<recipe-hash>/; `python -m stillpoint_lab.image.build`

Never boot the cached disk itself: boot a copy (`cp --sparse=always`). docs/lab-guest-image.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stillpoint_lab.image.build import GuestImage, ensure_guest_image

__all__ = ["GuestImage", "ensure_guest_image"]


def __getattr__(name: str) -> Any:
    # lazily, so that `python -m stillpoint_lab.image.build` does not import build twice
    if name in __all__:
        from stillpoint_lab.image import build

        return getattr(build, name)
    raise AttributeError(name)
