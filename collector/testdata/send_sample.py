"""Send looplag-shaped OTLP data to a collector, to record rotel's debug log.

Used to produce rotel-debug-sample.txt (see README.md beside this file):

    python send_sample.py grpc 127.0.0.1:4317
    python send_sample.py http http://127.0.0.1:4318
    python send_sample.py types 127.0.0.1:4317     # other value types, over gRPC

Needs the pip packages opentelemetry-sdk and opentelemetry-exporter-otlp.

What it sends ("grpc" and "http"):
  trace 1: "GET /block" (server) -> child "tokio.eventloop.stall" (internal) with string,
           int and f64 attributes and a multi-line string (a stack);
  trace 2: "GET /victim" (server) with a span event "tokio.eventloop.stall" (f64 and string
           attributes) and a span link to the stall span;
  metrics: histogram tokio.eventloop.delay (unit s, the crate's default bounds),
           monotonic counter tokio.eventloop.stalls (unit {stall}), cumulative.
"types": bool / array / negative int attributes, an error status, a f64 counter, an
up-down counter, a gauge and a (small) exponential histogram.
"""

import sys
import time

from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import (
    ExplicitBucketHistogramAggregation,
    ExponentialBucketHistogramAggregation,
    View,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

BOUNDS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
          0.25, 0.5, 1, 2.5, 5, 10]


def exporters(proto, endpoint):
    if proto == "http":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return (OTLPSpanExporter(endpoint=endpoint + "/v1/traces"),
                OTLPMetricExporter(endpoint=endpoint + "/v1/metrics"))
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return (OTLPSpanExporter(endpoint=endpoint, insecure=True),
            OTLPMetricExporter(endpoint=endpoint, insecure=True))


def send_contract(proto, endpoint):
    span_exporter, metric_exporter = exporters(proto, endpoint)
    resource = Resource.create({"service.name": f"looplag-sample-{proto}"})

    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    tracer = tracer_provider.get_tracer("looplag", "0.1.0")
    with tracer.start_as_current_span("GET /block", kind=SpanKind.SERVER) as request:
        request.set_attribute("http.route", "/block")
        with tracer.start_as_current_span(
            "tokio.eventloop.stall",
            kind=SpanKind.INTERNAL,
            attributes={
                "tokio.runtime.name": "main",
                "thread.id": 7,
                "thread.name": "tokio-runtime-worker",
                "tokio.eventloop.stall.kind": "blocked",
                "tokio.eventloop.stall.cpu_time": 0.0125,
                "code.stacktrace": "0: std::thread::sleep\n1: demo::handler",
            },
        ) as stall:
            time.sleep(0.01)
        stall_ctx = stall.get_span_context()
    with tracer.start_as_current_span(
        "GET /victim", kind=SpanKind.SERVER, links=[Link(stall_ctx, {"link.kind": "stall"})]
    ) as victim:
        victim.add_event("tokio.eventloop.stall", {
            "tokio.eventloop.stall.duration": 0.2503,
            "tokio.eventloop.stall.trace_id": format(stall_ctx.trace_id, "032x"),
            "tokio.eventloop.stall.span_id": format(stall_ctx.span_id, "016x"),
        })
    tracer_provider.shutdown()

    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=3_600_000)
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=[reader],
        views=[View(instrument_name="tokio.eventloop.delay",
                    aggregation=ExplicitBucketHistogramAggregation(BOUNDS))],
    )
    meter = meter_provider.get_meter("looplag", "0.1.0")
    delay = meter.create_histogram("tokio.eventloop.delay", unit="s", description="event loop delay")
    stalls = meter.create_counter("tokio.eventloop.stalls", unit="{stall}", description="stalls detected")
    for value in (0.00003, 0.00004, 0.0012, 0.3):
        delay.record(value, {"tokio.runtime.name": "main"})
    stalls.add(2, {"tokio.runtime.name": "main", "tokio.eventloop.stall.kind": "cpu"})
    meter_provider.shutdown()  # one export on shutdown


def send_types(endpoint):
    span_exporter, metric_exporter = exporters("grpc", endpoint)
    resource = Resource.create({"service.name": "looplag-sample-types"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    tracer = tracer_provider.get_tracer("looplag")
    with tracer.start_as_current_span("typed") as span:
        span.set_attribute("flag", True)
        span.set_attribute("ints", [1, 2])
        span.set_attribute("strs", ["x", "y"])
        span.set_attribute("negative", -5)
        span.set_status(Status(StatusCode.ERROR, "boom"))
    tracer_provider.shutdown()

    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=3_600_000)
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=[reader],
        views=[View(instrument_name="exp.hist",
                    aggregation=ExponentialBucketHistogramAggregation(max_size=4, max_scale=0))],
    )
    meter = meter_provider.get_meter("looplag")
    meter.create_counter("f64.counter", unit="s").add(1.5, {"k": "v"})
    meter.create_up_down_counter("updown").add(-3)
    meter.create_observable_gauge("gauge", callbacks=[lambda _options: [Observation(0.25, {"g": 1})]])
    histogram = meter.create_histogram("exp.hist", unit="s")
    for value in (0.001, 0.002, 0.5):
        histogram.record(value)
    meter_provider.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("grpc", "http", "types"):
        sys.exit("usage: send_sample.py grpc|http|types ENDPOINT")
    if sys.argv[1] == "types":
        send_types(sys.argv[2])
    else:
        send_contract(sys.argv[1], sys.argv[2])
    print("sent", sys.argv[1], file=sys.stderr)
