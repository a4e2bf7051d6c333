"""Where a frame's work runs, as one string the planner prints and the runtime takes (stdlib only).

    local                     every stage on the device (exits may answer early)
    offload                   the frame, PNG-compressed, to the cloud's whole model
    split:<stage>:<codec>     the device runs up to <stage>, sends the activation (codec fp32|int8|int4)
    split:<stage>:b<c>:<codec>  the same through a learned bottleneck of <c> channels
"""
from dataclasses import dataclass

SPLIT_CODECS = ("fp32", "int8", "int4")


@dataclass(frozen=True)
class Placement:
    kind: str                    # local | offload | split
    stage: str = ""
    bottleneck: int = 0          # channels; 0 = none
    codec: str = ""

    @classmethod
    def parse(cls, text: str) -> "Placement":
        parts = text.split(":")
        if parts == ["local"]:
            return cls("local")
        if parts == ["offload"]:
            return cls("offload", codec="png")
        if parts[0] == "split" and len(parts) in (3, 4) and parts[1]:
            codec = parts[-1]
            if codec not in SPLIT_CODECS:
                raise ValueError(f"placement '{text}': codec '{codec}' is not one of {', '.join(SPLIT_CODECS)}")
            bottleneck = 0
            if len(parts) == 4:
                if not (parts[2].startswith("b") and parts[2][1:].isdigit() and int(parts[2][1:]) > 0):
                    raise ValueError(f"placement '{text}': bottleneck '{parts[2]}' should look like b8")
                bottleneck = int(parts[2][1:])
            return cls("split", parts[1], bottleneck, codec)
        raise ValueError(f"placement '{text}' is not local, offload, split:<stage>:<codec> or "
                         "split:<stage>:b<channels>:<codec>")

    def __str__(self) -> str:
        if self.kind != "split":
            return self.kind
        return ":".join(["split", self.stage] + ([f"b{self.bottleneck}"] if self.bottleneck else []) + [self.codec])

    @property
    def bottleneck_key(self) -> str:
        return f"{self.stage}_b{self.bottleneck}"
