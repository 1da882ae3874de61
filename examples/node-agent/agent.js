// A mabeam agent in JavaScript, built only on proto/ and @grpc/grpc-js.
//
//   node examples/node-agent/agent.js --id node-1 --registry 127.0.0.1:50051 --value 99
//
// It serves mabeam.v1.AgentService (bids its value in sealed-bid auctions,
// proposes its value as its cost in Contract Net, executes `compute` steps by
// summing numbers, prints each message it is sent or a topic it is subscribed
// to brings: `message <topic> from <sender>: <json>`), registers with the registry, and keeps its lease alive
// over a Heartbeat stream. Ctrl-C (SIGINT/SIGTERM) deregisters it.
// With the capability `plan-sum` (--capabilities bid,compute,plan-sum) it is a planning agent:
// Plan turns {"values": [numbers]} into one `compute` step per number and a `total`.
//
// With auth on, it presents $MABEAM_TOKEN (an agent, operator or admin token)
// to the registry as `authorization: Bearer`, and serves AgentService only to
// the mesh's own services: callers whose bearer token's SHA-256 is among the
// service token digests the registry hands over (RegisterAgent, Heartbeat).
// Any other caller gets UNAUTHENTICATED. With no digest known (a registry
// without auth) every call is answered.
"use strict";

const crypto = require("crypto");
const os = require("os");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");

function argValue(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const agentId = argValue("id", process.env.MABEAM_AGENT_ID || "node-agent");
const registryAddress = argValue("registry", process.env.MABEAM_REGISTRY || "127.0.0.1:50051");
let value = Number(argValue("value", "50"));
const capabilities = (argValue("capabilities", "bid,compute") || "").split(",").filter(Boolean);
const leaseTtl = Number(argValue("lease-ttl", "5"));
const meshToken = (process.env.MABEAM_TOKEN || "").trim();
// The registration token it heartbeats with: the one its supervisor gave it
// (MABEAM_AGENT_TOKEN), then the registry's answer, then the one the registry
// issues with ImportState when the agent migrates here. ExportState never
// returns it: the state alone leaves this process.
let registrationToken = process.env.MABEAM_AGENT_ID === agentId ? process.env.MABEAM_AGENT_TOKEN || "" : "";

// What this agent presents to the registry.
function credentials() {
  const metadata = new grpc.Metadata();
  if (meshToken) metadata.add("authorization", `Bearer ${meshToken}`);
  return metadata;
}

// The digests (32 bytes each) of the mesh's service tokens; empty: nothing is checked.
let serviceDigests = [];

function learnDigests(hexDigests) {
  const fresh = (hexDigests || []).filter((d) => /^[0-9a-f]{64}$/.test(d)).map((d) => Buffer.from(d, "hex"));
  if (fresh.length) serviceDigests = fresh; // once known, checks never switch off
}

// Null when the caller is the mesh (or nothing is checked), else the refusal.
function refusal(call) {
  if (!serviceDigests.length) return null;
  const [raw] = call.metadata.get("authorization");
  const header = typeof raw === "string" ? raw : raw ? raw.toString("latin1") : "";
  const match = /^bearer\s+(\S{1,500})\s*$/i.exec(header);
  if (!match) {
    return { code: grpc.status.UNAUTHENTICATED, details: "no credentials: only the mesh's services call agents" };
  }
  const mine = crypto.createHash("sha256").update(match[1]).digest();
  let known = false;
  for (const d of serviceDigests) known = crypto.timingSafeEqual(mine, d) || known; // no early exit
  return known ? null : { code: grpc.status.UNAUTHENTICATED, details: "not a mesh service token" };
}

// Every AgentService handler runs only after the caller is checked.
function guarded(handlers) {
  const out = {};
  for (const [name, handler] of Object.entries(handlers)) {
    out[name] = (call, callback) => {
      const refused = refusal(call);
      return refused ? callback(refused) : handler(call, callback);
    };
  }
  return out;
}

const definition = protoLoader.loadSync(
  ["mabeam/v1/agent.proto", "mabeam/v1/registry.proto"],
  { includeDirs: [PROTO_ROOT], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const mabeam = grpc.loadPackageDefinition(definition).mabeam.v1;

// google.protobuf.Value / Struct come from protobufjs's own descriptors, whose
// field names are camelCase (numberValue, listValue, ...) whatever keepCase says.
function numbers(value) {
  if (value === null || value === undefined) return [];
  if (value.kind === "numberValue") return [value.numberValue];
  if (value.kind === "listValue") return value.listValue.values.flatMap(numbers);
  if (value.kind === "structValue") return numbers(value.structValue.fields.values);
  return [];
}

// The messages taken (insertion-ordered: the oldest is dropped first).
const seenMessages = new Set();

// A google.protobuf.Value (protobufjs's camelCase form) as plain JSON.
function plain(value) {
  if (!value) return null;
  if (value.kind === "structValue") {
    const out = {};
    for (const [k, v] of Object.entries((value.structValue && value.structValue.fields) || {})) out[k] = plain(v);
    return out;
  }
  if (value.kind === "listValue") return value.listValue.values.map(plain);
  if (value.kind === "nullValue") return null;
  return value[value.kind];
}

const service = {
  Coordinate(call, callback) {
    const request = call.request;
    if (request.agent_id !== agentId) {
      return callback({ code: grpc.status.NOT_FOUND, details: `agent ${request.agent_id} is not hosted here` });
    }
    switch (request.message) {
      case "bid_request":
        return callback(null, { agent_id: agentId, bid: { amount: value } });
      case "price_quote":
        return callback(null, { agent_id: agentId, price_answer: { accept: request.price_quote.price <= value } });
      case "task_announcement":
        return callback(null, { agent_id: agentId, proposal: { cost: value } });
      case "award":
      case "reject":
        return callback(null, { agent_id: agentId, ack: {} });
      default:
        return callback(null, { agent_id: agentId, decline: { reason: `node agent does not answer ${request.message}` } });
    }
  },
  CoordinateBatch(call, callback) {
    callback({ code: grpc.status.UNIMPLEMENTED, details: "one agent here: use Coordinate" });
  },
  ExecuteStep(call, callback) {
    const request = call.request;
    let total = numbers(request.input).reduce((a, b) => a + b, 0);
    for (const output of Object.values(request.dependency_outputs || {})) {
      const fields = output.structValue && output.structValue.fields;
      if (fields && fields.sum) total += fields.sum.numberValue;
    }
    callback(null, {
      output: {
        structValue: {
          fields: { sum: { numberValue: total }, agent: { stringValue: agentId }, language: { stringValue: "javascript" } },
        },
      },
    });
  },
  // Plan (a planning agent, when it has the capability `plan-sum`): the objective's input, or an
  // expandable step's, {"values": [numbers]} becomes one `compute` step per number and a `total`
  // step that depends on them all (it sums their outputs). Without `plan-sum` it does not plan.
  Plan(call, callback) {
    const request = call.request;
    if (request.agent_id !== agentId) {
      return callback({ code: grpc.status.NOT_FOUND, details: `agent ${request.agent_id} is not hosted here` });
    }
    if (!capabilities.includes("plan-sum")) {
      return callback({ code: grpc.status.UNIMPLEMENTED, details: `agent ${agentId} does not plan` });
    }
    const values = numbers(request.input);
    if (!values.length || values.length + 1 > request.max_steps) {
      return callback({
        code: grpc.status.INVALID_ARGUMENT,
        details: `input.values: 1 to ${request.max_steps - 1} numbers to plan, got ${values.length}`,
      });
    }
    const steps = values.map((v, i) => ({ step_id: `part${i}`, capability: "compute", input: { numberValue: v } }));
    steps.push({
      step_id: "total",
      capability: "compute",
      input: { numberValue: 0 },
      depends_on: steps.map((s) => s.step_id),
    });
    callback(null, { steps });
  },
  ExportState(call, callback) {
    callback(null, { state: Buffer.from(JSON.stringify({ value })), content_type: "application/json" });
  },
  ImportState(call, callback) {
    const request = call.request;
    try {
      const state = JSON.parse(Buffer.from(request.state || []).toString() || "{}");
      if (typeof state.value === "number") value = state.value;
    } catch (e) {
      return callback({ code: grpc.status.INVALID_ARGUMENT, details: "state is not this agent's JSON" });
    }
    if (request.token) registrationToken = request.token; // issued by the registry at migration
    callback(null, {});
  },
  // A message (MessagingService.Send or Publish): handled at once, so in arrival order and with no
  // inbox to fill; a (sender_id, message_id) among the last 4,096 taken is a duplicate, not handled again.
  Deliver(call, callback) {
    const request = call.request;
    if (request.agent_id !== agentId) {
      return callback({ code: grpc.status.NOT_FOUND, details: `agent ${request.agent_id} is not hosted here` });
    }
    const message = request.message || {};
    const key = `${message.sender_id}\u0000${message.message_id}`;
    if (seenMessages.has(key)) return callback(null, { duplicate: true });
    seenMessages.add(key);
    if (seenMessages.size > 4096) seenMessages.delete(seenMessages.values().next().value);
    const payload = message.payload === "json" ? plain({ kind: "structValue", structValue: message.json }) : message.any;
    console.log(`message ${message.topic || "-"} from ${message.sender_id}: ${JSON.stringify(payload)}`);
    callback(null, { duplicate: false });
  },
  DeliverBatch(call, callback) {
    callback({ code: grpc.status.UNIMPLEMENTED, details: "one agent here: use Deliver" });
  },
};

const server = new grpc.Server();
server.addService(mabeam.AgentService.service, guarded(service));
server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) throw err;
  const endpoint = `127.0.0.1:${port}`;
  const registry = new mabeam.RegistryService(registryAddress, grpc.credentials.createInsecure());
  const ttlSeconds = Math.max(1, Math.round(leaseTtl));
  registry.RegisterAgent(
    {
      agent_id: agentId,
      endpoint,
      capabilities,
      labels: { language: "javascript" },
      lease_ttl: { seconds: ttlSeconds },
      token: registrationToken,
      // The node it runs on: the one its supervisor gave it, else the host name.
      node: (process.env.MABEAM_NODE_NAME || os.hostname()).replace(/[^A-Za-z0-9._:-]/g, "-").slice(0, 128),
    },
    credentials(),
    (error, reply) => {
      if (error) {
        console.error(`registration failed: ${error.details}`);
        process.exit(1);
      }
      learnDigests(reply.service_token_digests);
      registrationToken = reply.token;
      const beats = registry.Heartbeat(credentials());
      beats.on("error", (e) => {
        console.error(`heartbeat stream ended: ${e.details}`);
        process.exit(1);
      });
      beats.on("data", (answer) => learnDigests(answer.service_token_digests));
      // Each beat carries the process's resident memory (process.memoryUsage().rss) and its CPU
      // use since the previous beat as a fraction of one core (process.cpuUsage()).
      let lastCpu = process.cpuUsage();
      let lastAt = process.hrtime.bigint();
      const measured = () => {
        const cpu = process.cpuUsage(lastCpu);
        const now = process.hrtime.bigint();
        const elapsedUs = Number(now - lastAt) / 1000;
        lastCpu = process.cpuUsage();
        lastAt = now;
        const fraction = elapsedUs > 0 ? (cpu.user + cpu.system) / elapsedUs : 0;
        return { load: 0, memory_bytes: String(process.memoryUsage().rss), cpu_fraction: fraction };
      };
      const beat = () => beats.write({ agent_id: agentId, token: registrationToken, load: measured() });
      beat();
      const timer = setInterval(beat, (reply.agent.lease_ttl.seconds * 1000) / 3);
      console.log(`mabeam agents serving on ${endpoint}: ${agentId}`);
      const stop = () => {
        clearInterval(timer);
        beats.end();
        registry.DeregisterAgent({ agent_id: agentId, token: registrationToken }, credentials(), () => {
          server.forceShutdown();
          process.exit(0);
        });
      };
      process.on("SIGINT", stop);
      process.on("SIGTERM", stop);
    },
  );
});
