from lean.models.camera import BackboneGraph, CameraBranch, VTransformGraph, build_camera

__all__ = ["BackboneGraph", "CameraBranch", "VTransformGraph", "build_camera"]
