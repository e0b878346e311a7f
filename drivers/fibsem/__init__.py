"""FIB-SEM bridge backends: one per vendor API, all implementing ``clemflow.bridge.backend.Backend``.

- ``SmartSEMBackend`` — Zeiss SmartSEM remote API (CZEMApi over COM).
- ``AutoScriptBackend`` — Thermo AutoScript (``autoscript_sdb_microscope_client``).
- ``OpenFIBSEMBackend`` — OpenFIBSEM's ``FibsemMicroscope`` (optional ``fibsem`` package).

Vendor packages are imported only inside each backend's ``connect()``, so this
package imports anywhere; the look-alike simulators in ``clemflow.simulators.fibsem``
have the same shapes and run these same backends off the microscope.
"""

from .autoscript import AutoScriptBackend
from .openfibsem import OpenFIBSEMBackend
from .smartsem import SmartSEMBackend

__all__ = ["AutoScriptBackend", "OpenFIBSEMBackend", "SmartSEMBackend"]
