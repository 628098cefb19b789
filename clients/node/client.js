// A pqueue client from proto-bundle/ alone: enqueue, lease and ack one job,
// and tell UNAVAILABLE + NOT_TAKEN (the call did not run: retry anything)
// from a plain UNAVAILABLE (it may have run). See docs/other-languages.md.
// Usage: node client.js HOST:PORT [QUEUE]
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const BUNDLE = process.env.PQ_PROTO_BUNDLE || path.join(__dirname, "../../proto-bundle");
const opts = { includeDirs: [BUNDLE], keepCase: true, longs: String, defaults: true };
const v1 = grpc.loadPackageDefinition(loader.loadSync("pqueue/v1/queue.proto", opts)).pqueue.v1;
const rpc = new protobuf.Root();
rpc.resolvePath = (_origin, target) => path.join(BUNDLE, target);
rpc.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const [Status, ErrorInfo] = ["google.rpc.Status", "google.rpc.ErrorInfo"].map((n) => rpc.lookupType(n));

// The ErrorInfo of a failed call (from the grpc-status-details-bin trailer), if any.
function errorInfo(err) {
  const [bin] = err.metadata ? err.metadata.get("grpc-status-details-bin") : [];
  if (!bin) return null;
  const any = Status.decode(bin).details.find((d) => d.type_url.endsWith("/google.rpc.ErrorInfo"));
  return any ? ErrorInfo.decode(any.value) : null;
}

const [address, queue = "node-demo"] = process.argv.slice(2);
const q = new v1.Queue(address, grpc.credentials.createInsecure());
const call = (method, req) =>
  new Promise((ok, fail) =>
    q[method](req, { deadline: Date.now() + 10000 }, (e, res) => (e ? fail(e) : ok(res))));

(async () => {
  const { job_id } = await call("Enqueue", { queue, job: { payload: Buffer.from("hello") } });
  console.log(`enqueued ${job_id}`);
  const { jobs } = await call("Lease", { queue, max_jobs: 1, wait_ms: 5000 });
  console.log(`leased ${jobs[0].job_id} lease ${jobs[0].lease_id} payload ${jobs[0].payload}`);
  const { acked } = await call("Ack", { queue, leases: [jobs[0]] });
  console.log(`acked ${acked}`);
})().catch((err) => {
  const info = errorInfo(err);
  if (err.code === grpc.status.UNAVAILABLE && info && info.reason === "NOT_TAKEN") {
    console.log(`NOT_TAKEN (did not run, safe to retry): ${err.details} ${JSON.stringify(info.metadata)}`);
  } else if (err.code === grpc.status.UNAVAILABLE) {
    console.log(`UNAVAILABLE ${info ? info.reason : "(no details)"} (may have run): ${err.details}`);
  } else {
    console.log(`${grpc.status[err.code]}: ${err.details}`);
  }
  process.exitCode = 1;
});
