"""Per model-version statistics, as ModelStatistics reports them (Triton's fields)."""
import time
from collections import defaultdict
from dataclasses import dataclass, field

from edgefold_proto import pb


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_pb(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class ModelStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0           # batch elements served
    execution_count: int = 0           # backend runs (a merged batch is one)
    last_inference_ms: int = 0
    batches: dict = field(default_factory=lambda: defaultdict(Duration))  # batch size -> compute time

    def request_done(self, ok: bool, total_ns: int, queue_ns: int = 0) -> None:
        (self.success if ok else self.fail).add(total_ns)
        if ok:
            self.queue.add(queue_ns)
            self.last_inference_ms = time.time_ns() // 1_000_000

    def execution_done(self, batch_size: int, compute_ns: int, requests: int = 1) -> None:
        self.execution_count += 1
        self.inference_count += batch_size
        self.compute_infer.add(compute_ns, requests)
        self.batches[batch_size].add(compute_ns)

    def to_pb(self, name: str, version: str) -> pb.ModelStatistics:
        return pb.ModelStatistics(
            name=name, version=version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.to_pb(), fail=self.fail.to_pb(),
                queue=self.queue.to_pb(), compute_infer=self.compute_infer.to_pb()),
            batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=d.to_pb())
                         for size, d in sorted(self.batches.items())],
        )
