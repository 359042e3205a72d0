'use strict';
/**
 * A purchase worker written the way a Node.js team would, traced only by OpenTelemetry's standard
 * auto-instrumentation (./tracing.js): it stands in for hoptrace's reference purchase-worker so
 * hoptrace can be tested on spans it did not write.
 *
 * Per record of $CONSUME_TOPIC (group $GROUP): parse hoptrace's envelope (a PURCHASE_CONFIRMED v1),
 * then in ONE transaction insert the student_course_purchases row and a processed mark in this
 * worker's own table node_processed (a record whose mark exists is skipped), then emit
 * PURCHASE_CREATED to $EMIT_TOPIC keyed by the payment id, then commit the offset.
 *
 * Environment:
 *   KAFKA_BOOTSTRAP, DATABASE_URL, CONSUME_TOPIC, EMIT_TOPIC, GROUP   required
 *   STEP       the handler name in the mark and the emitted event id's seed (purchase.created)
 *   CARRIER    baggage (default) | attribute | key: how the payment id reaches the spans
 *   FAULT      fail-db-write: the purchase insert names a missing column, every time
 *   OTEL_*     the SDK's standard variables (OTEL_SERVICE_NAME, OTEL_EXPORTER_OTLP_ENDPOINT, ...)
 *
 * A failed record is thrown out of eachMessage: the kafkajs instrumentation sets ERROR on its
 * process span, kafkajs retries it (the offset is not committed, so it is fetched again) and,
 * once the retries are spent, restarts the consumer (rejoin) and goes on retrying. The process
 * keeps running; the record blocks its partition and every attempt leaves failed spans.
 *
 * Prints READY on stdout once the consumer has joined its group with partitions of
 * $CONSUME_TOPIC; on SIGTERM/SIGINT disconnects, flushes spans (sdk.shutdown()) and exits 0.
 */

const { sdk, CARRIER, BAGGAGE_KEY } = require('./tracing');
const { context, propagation, trace } = require('@opentelemetry/api');
const { Kafka, logLevel, Partitioners } = require('kafkajs');
const { Pool } = require('pg');
const { BadEnvelope, parseEnvelope, newEnvelope, nextEventId } = require('./envelope');

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`node-worker: ${name} is not set`);
    process.exit(2);
  }
  return value;
}

const BOOTSTRAP = required('KAFKA_BOOTSTRAP');
const DATABASE_URL = required('DATABASE_URL');
const CONSUME_TOPIC = required('CONSUME_TOPIC');
const EMIT_TOPIC = required('EMIT_TOPIC');
const GROUP = required('GROUP');
const STEP = process.env.STEP || 'purchase.created';
const FAULT = process.env.FAULT || '';
const FAULTS = ['', 'fail-db-write'];
if (!FAULTS.includes(FAULT)) {
  console.error(`node-worker: FAULT=${FAULT}: expected fail-db-write or nothing`);
  process.exit(2);
}

const CONSUMES = 'PURCHASE_CONFIRMED';
const EMITS = 'PURCHASE_CREATED';
const CORRELATION_HEADER = 'x-correlation-id';
const ATTRIBUTE_CARRIER = 'app.payment_id';

const ENSURE_MARKS = `CREATE TABLE IF NOT EXISTS node_processed (
  msg_id text PRIMARY KEY,
  kind text NOT NULL,
  payment_ref text NOT NULL,
  handler text NOT NULL,
  handled_at timestamptz NOT NULL DEFAULT now())`;
const SEEN = 'SELECT 1 FROM node_processed WHERE msg_id = $1';
const MARK = 'INSERT INTO node_processed (msg_id, kind, payment_ref, handler) VALUES ($1, $2, $3, $4)';
const INSERT_PURCHASE = `INSERT INTO student_course_purchases
  (correlation_id, payment_id, student, course, metadata)
  VALUES ($1, $2, $3, $4, $5::jsonb)
  ON CONFLICT (correlation_id) DO UPDATE SET correlation_id = EXCLUDED.correlation_id
  RETURNING id`;
// FAULT=fail-db-write: the same insert into a column the table does not have.
const INSERT_PURCHASE_FAULTY = INSERT_PURCHASE.replace('metadata)', 'metadata, no_such_column)').replace(
  '$5::jsonb)',
  '$5::jsonb, 1)',
);

const log = (line) => console.error(`node-worker: ${line}`);

const kafka = new Kafka({
  clientId: process.env.OTEL_SERVICE_NAME || 'node-purchase-worker',
  brokers: BOOTSTRAP.split(','),
  logLevel: logLevel.WARN,
});
const consumer = kafka.consumer({
  groupId: GROUP,
  allowAutoTopicCreation: false,
  retry: { initialRetryTime: 300, retries: 3 },
});
const producer = kafka.producer({
  allowAutoTopicCreation: false,
  createPartitioner: Partitioners.DefaultPartitioner,
});
const pool = new Pool({ connectionString: DATABASE_URL, max: 2 });

function header(message, name) {
  const value = message.headers?.[name];
  if (value == null) return '';
  return (Array.isArray(value) ? value[0] : value).toString('utf8');
}

/** The record's purchase fields, or null (with the reason logged) when it is not one. */
function purchaseOf(envelope, where) {
  if (envelope.type !== CONSUMES || envelope.version !== 1) {
    log(`skipping ${where}: expected ${CONSUMES} v1, got ${envelope.type} v${envelope.version}`);
    return null;
  }
  const { payment_id: paymentId, student, course } = envelope.payload;
  for (const [field, value] of Object.entries({ payment_id: paymentId, student, course })) {
    if (typeof value !== 'string' || value === '') {
      log(`skipping ${where}: payload.${field} missing`);
      return null;
    }
  }
  return { paymentId, student, course };
}

/** The transaction: skip a marked record, else write the purchase and the mark together. */
async function writePurchase(envelope, purchase, correlationId) {
  const client = await pool.connect();
  try {
    await client.query('BEGIN');
    const seen = await client.query(SEEN, [envelope.event_id]);
    if (seen.rowCount > 0) {
      await client.query('ROLLBACK');
      return null;
    }
    const metadata = { source: 'payment', payment_id: purchase.paymentId, event_id: envelope.event_id };
    const inserted = await client.query(FAULT === 'fail-db-write' ? INSERT_PURCHASE_FAULTY : INSERT_PURCHASE, [
      correlationId,
      purchase.paymentId,
      purchase.student,
      purchase.course,
      JSON.stringify(metadata),
    ]);
    await client.query(MARK, [envelope.event_id, envelope.type, purchase.paymentId, STEP]);
    await client.query('COMMIT');
    return Number(inserted.rows[0].id);
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  } finally {
    client.release();
  }
}

async function handle(envelope, purchase, correlationId) {
  const purchaseId = await writePurchase(envelope, purchase, correlationId);
  if (purchaseId === null) {
    log(`skipping event ${envelope.event_id}: already processed`);
    return;
  }
  const event = newEnvelope(
    EMITS,
    1,
    correlationId,
    { payment_id: purchase.paymentId, purchase_id: purchaseId, student: purchase.student, course: purchase.course },
    nextEventId(envelope.event_id, STEP),
  );
  const headers = CARRIER === 'key' ? {} : { [CORRELATION_HEADER]: correlationId };
  await producer.send({
    topic: EMIT_TOPIC,
    messages: [{ key: purchase.paymentId, value: JSON.stringify(event), headers }],
  });
}

async function eachMessage({ topic, partition, message }) {
  const where = `${topic}[${partition}]@${message.offset}`;
  let envelope;
  try {
    envelope = parseEnvelope(message.value);
  } catch (err) {
    if (err instanceof BadEnvelope) {
      log(`skipping ${where}: ${err.message}`);
      return;
    }
    throw err;
  }
  const purchase = purchaseOf(envelope, where);
  if (purchase === null) return;
  const correlationId = envelope.correlation_id || header(message, CORRELATION_HEADER) || purchase.paymentId;

  // The carrier: what makes the payment id visible on this service's spans.
  let ctx = context.active();
  if (CARRIER === 'baggage') {
    const baggage = propagation.getBaggage(ctx) ?? propagation.createBaggage();
    ctx = propagation.setBaggage(ctx, baggage.setEntry(BAGGAGE_KEY, { value: purchase.paymentId }));
  } else {
    ctx = propagation.deleteBaggage(ctx); // no baggage reaches the spans or the emitted record
    if (CARRIER === 'attribute') trace.getActiveSpan()?.setAttribute(ATTRIBUTE_CARRIER, purchase.paymentId);
  }
  try {
    await context.with(ctx, () => handle(envelope, purchase, correlationId));
  } catch (err) {
    log(`${where} failed: ${err.message}`);
    throw err;
  }
}

let ready = false;
let stopping = false;

async function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  log(`${signal}: stopping`);
  for (const [what, close] of [
    ['consumer', () => consumer.disconnect()],
    ['producer', () => producer.disconnect()],
    ['database pool', () => pool.end()],
    ['tracing', () => sdk.shutdown()],
  ]) {
    try {
      await close();
    } catch (err) {
      log(`closing the ${what} failed: ${err.message}`);
    }
  }
  process.exit(0);
}

async function main() {
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));
  await pool.query(ENSURE_MARKS);
  await producer.connect();
  consumer.on(consumer.events.GROUP_JOIN, ({ payload }) => {
    const partitions = payload.memberAssignment[CONSUME_TOPIC] || [];
    if (!ready && partitions.length > 0) {
      ready = true;
      log(`joined ${GROUP} with ${CONSUME_TOPIC} partitions ${partitions.join(',')} (carrier ${CARRIER}${FAULT ? `, fault ${FAULT}` : ''})`);
      process.stdout.write('READY\n');
    }
  });
  consumer.on(consumer.events.CRASH, ({ payload }) => {
    log(`consumer crashed (${payload.error.message}); restart: ${payload.restart}`);
  });
  await consumer.connect();
  await consumer.subscribe({ topics: [CONSUME_TOPIC], fromBeginning: true });
  // autoCommitThreshold 1: the offset is committed after every record that succeeded.
  await consumer.run({ autoCommit: true, autoCommitThreshold: 1, eachMessage });
}

main().catch(async (err) => {
  log(`fatal: ${err.stack || err}`);
  await sdk.shutdown().catch(() => {});
  process.exit(1);
});
