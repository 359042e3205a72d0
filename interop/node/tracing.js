'use strict';
/**
 * OpenTelemetry setup, the way a Node.js team would write it from the SDK's README: NodeSDK with
 * the kafkajs and pg auto-instrumentations and an OTLP trace exporter (HTTP/protobuf or gRPC).
 *
 * Everything comes from the standard environment: OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_ENDPOINT
 * (the HTTP exporter appends /v1/traces), OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or
 * OTEL_EXPORTER_OTLP_PROTOCOL (http/protobuf, the default, or grpc), OTEL_BSP_* for the batch
 * processor, OTEL_PROPAGATORS (default tracecontext,baggage). Metrics and logs are not exported unless OTEL_METRICS_EXPORTER /
 * OTEL_LOGS_EXPORTER ask for them (the SDK's default would post both to the same endpoint).
 *
 * CARRIER=baggage (default) adds a BaggageSpanProcessor that copies the baggage key
 * hoptrace.correlation_id onto every span started in a context that carries it, as hoptrace's
 * README asks of a service. CARRIER=attribute and CARRIER=key install no baggage processor.
 *
 * This module must be required before kafkajs and pg: the instrumentations patch `require`.
 */

process.env.OTEL_METRICS_EXPORTER ??= 'none';
process.env.OTEL_LOGS_EXPORTER ??= 'none';

const { NodeSDK, tracing } = require('@opentelemetry/sdk-node');
const { KafkaJsInstrumentation } = require('@opentelemetry/instrumentation-kafkajs');
const { PgInstrumentation } = require('@opentelemetry/instrumentation-pg');
const { BaggageSpanProcessor } = require('@opentelemetry/baggage-span-processor');

/** The baggage key (and span attribute) hoptrace reads a correlation id from. */
const BAGGAGE_KEY = 'hoptrace.correlation_id';

const CARRIERS = ['baggage', 'attribute', 'key'];
const CARRIER = process.env.CARRIER || 'baggage';
if (!CARRIERS.includes(CARRIER)) {
  throw new Error(`CARRIER=${CARRIER}: expected one of ${CARRIERS.join(', ')}`);
}

/** The OTLP trace exporter the standard protocol variables ask for. */
function traceExporter() {
  const protocol =
    process.env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL || process.env.OTEL_EXPORTER_OTLP_PROTOCOL || 'http/protobuf';
  if (protocol === 'grpc') {
    const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-grpc');
    return new OTLPTraceExporter();
  }
  if (protocol === 'http/protobuf') {
    const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-proto');
    return new OTLPTraceExporter();
  }
  throw new Error(`OTLP protocol ${protocol}: expected http/protobuf or grpc`);
}

const spanProcessors = [];
if (CARRIER === 'baggage') {
  spanProcessors.push(new BaggageSpanProcessor((key) => key === BAGGAGE_KEY));
}
// BatchSpanProcessor reads OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_EXPORT_BATCH_SIZE, ... itself.
spanProcessors.push(new tracing.BatchSpanProcessor(traceExporter()));

const sdk = new NodeSDK({
  spanProcessors,
  instrumentations: [new KafkaJsInstrumentation(), new PgInstrumentation()],
});
sdk.start();

module.exports = { sdk, CARRIER, BAGGAGE_KEY };
