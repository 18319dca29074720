// A read-through response cache in front of the Node FHIR test server, for bench/gateway.py.
//
// Usage: node bench/fhir_cache.mjs --upstream http://127.0.0.1:N/fhir/R4 --port M
//
// Why: the test server (medplum's MemoryRepository) evaluates the `patient` search parameter's
// FHIRPath for every stored resource: `Observation?patient=Patient/x` over 100 Observations takes
// ~180 ms, so a benchmark through it measures medplum, not the gateways in front of it. This
// process answers each GET with exactly the bytes the test server gave for the same path and
// query the first time (status 200 only; the test server's own origin in paging links is
// rewritten to this one, so links stay same-origin). The data never changes during a run.
//
// - Listens on 127.0.0.1; FHIR base http://127.0.0.1:M/fhir/R4; GET /healthz answers 200.
// - Prints `READY <port>` on stdout once listening; SIGTERM/SIGINT close it.

import { createServer } from 'node:http';
import process from 'node:process';

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (argv[i] === '--upstream') args.upstream = argv[i + 1].replace(/\/+$/, '');
    else if (argv[i] === '--port') args.port = Number.parseInt(argv[i + 1], 10);
    else throw new Error(`unknown argument: ${argv[i]}`);
  }
  if (!args.upstream || !Number.isInteger(args.port)) throw new Error('--upstream URL and --port N are required');
  return args;
}

const args = parseArgs(process.argv.slice(2));
const upstream = new URL(args.upstream);
const cache = new Map(); // path + query -> { body: Buffer, contentType }
let origin = '';

async function fill(key) {
  const response = await fetch(upstream.origin + key, { headers: { accept: 'application/fhir+json' } });
  const text = (await response.text()).split(upstream.origin).join(origin);
  const entry = { status: response.status, body: Buffer.from(text, 'utf8'),
                  contentType: response.headers.get('content-type') ?? 'application/fhir+json' };
  if (response.status === 200) cache.set(key, entry);
  return entry;
}

const server = createServer(async (req, res) => {
  try {
    if (req.url === '/healthz') {
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': 15 });
      res.end('{"status":"ok"}');
      return;
    }
    if (req.method !== 'GET') {
      res.writeHead(405, { 'content-length': 0 });
      res.end();
      return;
    }
    const entry = cache.get(req.url) ?? (await fill(req.url));
    res.writeHead(entry.status, { 'content-type': entry.contentType, 'content-length': entry.body.length });
    res.end(entry.body);
  } catch (err) {
    process.stderr.write(`request failed: ${err?.stack ?? err}\n`);
    if (!res.headersSent) res.writeHead(502, { 'content-length': 0 });
    res.end();
  }
});
server.keepAliveTimeout = 5000;

const shutdown = () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

server.listen(args.port, '127.0.0.1', () => {
  origin = `http://127.0.0.1:${server.address().port}`;
  process.stdout.write(`READY ${server.address().port}\n`);
});
