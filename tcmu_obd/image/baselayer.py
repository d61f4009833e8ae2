"""The bundled overlaybd base layer (data/ext4_64, Apache-2.0, from the
overlaybd project): where it is, and what it must hash to.  Nothing else."""
import os

SHA256 = "c3a417552a6cf9ffa959b541850bab7d7f08f4255425bf8b48c85f7b36b378d9"
SIZE = 4737695
UUID = "C02FB491-B4D4-4904-8684-A014D032AF78"
INSTALL_PATH = "/opt/overlaybd/baselayers/ext4_64"   # where overlaybd's tools expect it


def path():
    """Filesystem path of the bundled ext4_64."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "ext4_64")
