"""Stillpoint: an application-consistent backup appliance for VMware vSphere.

Layers (dependencies point one way):
    cli -> jobs -> {vsphere, guest, repository} ; lab is the test/demo environment.
"""

__version__ = "0.1.0"
