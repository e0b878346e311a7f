"""Vendor look-alike FIB-SEM simulators over one simulated instrument (see README.md here).

    inst = SimulatedFibSem(state_dir)          # the instrument (state saved in state_dir)
    api = SmartSEMApi(inst)                    # Zeiss SmartSEM (CZEMApi) shape
    client = SdbMicroscopeClient(inst)         # Thermo AutoScript shape
"""

from .errors import InstrumentError
from .faults import FAULT_NAMES, FaultPanel
from .frame_log import read_frame_log
from .instrument import SMALL_WORLD, SimulatedFibSem
from .milling import read_mill_log
from .smartsem import FIB_PROBES, SmartSEMApi
from .autoscript import SdbMicroscopeClient
from .view import FACE_RISE_PER_S

__all__ = [
    "FACE_RISE_PER_S",
    "FAULT_NAMES",
    "FIB_PROBES",
    "SMALL_WORLD",
    "FaultPanel",
    "InstrumentError",
    "SimulatedFibSem",
    "SdbMicroscopeClient",
    "SmartSEMApi",
    "read_frame_log",
    "read_mill_log",
]
