"""EAR-style detection and routing on the device: feature taps, OOD detectors (HDC and
baselines), and the reconfigurator that routes inputs to adapters and hands novel data
to growth."""
