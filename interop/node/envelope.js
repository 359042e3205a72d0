'use strict';
/**
 * hoptrace's event envelope in plain JavaScript: {event_id, type, version, correlation_id,
 * occurred_at, payload} as JSON (instrumentation/envelope.py is the Python side), and the
 * deterministic id of the event a step emits for a source event (uuid5 over the same namespace
 * and name as hoptrace's next_event_id, so a re-emit carries the same id).
 */

const crypto = require('node:crypto');

const EVENT_NAMESPACE = '5f1c1c52-8a55-4c1e-9a67-6b7f0d6b6a11';

class BadEnvelope extends Error {}

/** Bytes of a Kafka record value -> envelope object; throws BadEnvelope with the reason. */
function parseEnvelope(value) {
  if (value == null) throw new BadEnvelope('empty record value');
  let raw;
  try {
    raw = JSON.parse(value.toString('utf8'));
  } catch (err) {
    throw new BadEnvelope(`not JSON: ${err.message}`);
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    throw new BadEnvelope('not a JSON object');
  }
  for (const field of ['event_id', 'type']) {
    if (typeof raw[field] !== 'string' || raw[field] === '') {
      throw new BadEnvelope(`${field}: missing or not a string`);
    }
  }
  if (!Number.isInteger(raw.version) || raw.version < 1) {
    throw new BadEnvelope('version: not an integer >= 1');
  }
  if (typeof raw.occurred_at !== 'string') throw new BadEnvelope('occurred_at: missing');
  return {
    event_id: raw.event_id,
    type: raw.type,
    version: raw.version,
    correlation_id: typeof raw.correlation_id === 'string' ? raw.correlation_id : '',
    occurred_at: raw.occurred_at,
    payload: raw.payload && typeof raw.payload === 'object' ? raw.payload : {},
  };
}

/** A new envelope stamped now (UTC). */
function newEnvelope(type, version, correlationId, payload, eventId) {
  return {
    event_id: eventId || crypto.randomUUID(),
    type,
    version,
    correlation_id: correlationId,
    occurred_at: new Date().toISOString(),
    payload,
  };
}

/** RFC 4122 version-5 UUID of `name` in `namespace` (what Python's uuid.uuid5 returns). */
function uuid5(namespace, name) {
  const ns = Buffer.from(namespace.replace(/-/g, ''), 'hex');
  const hash = crypto.createHash('sha1').update(ns).update(Buffer.from(name, 'utf8')).digest();
  const b = hash.subarray(0, 16);
  b[6] = (b[6] & 0x0f) | 0x50;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = b.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** The id of the event `stepId` emits for the source event `sourceEventId`. */
function nextEventId(sourceEventId, stepId) {
  return uuid5(EVENT_NAMESPACE, `${sourceEventId}\x1f${stepId}`);
}

module.exports = { BadEnvelope, parseEnvelope, newEnvelope, nextEventId };
