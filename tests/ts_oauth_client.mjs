// An MCP client built on the official TypeScript SDK
// (@modelcontextprotocol/client, pinned in tests/node/package.json), run by
// tests/test_ts_client.py against a broker's /mcp.
//
// It lets the SDK do the OAuth dance (discovery, dynamic registration,
// authorization with PKCE, the token request) with an in-memory
// OAuthClientProvider.  The person at the browser is the test: when the SDK
// wants the user agent sent to the authorization URL, this program prints
// one line `AUTHORIZE <url>` on stdout and waits for one line on stdin, the
// URL the broker finally redirected to (the redirect URI with code, state
// and iss).  Nothing listens on the redirect URI.  It then finishes the
// authorization, connects again, lists the tools, calls the ones named with
// --call (in order, --call-interval seconds apart) and prints one final line
// `SUMMARY <json>`: the negotiated protocol version and era, the tools, each
// call's result, and every HTTP request it made (method, path, status, the
// Mcp-Method and MCP-Protocol-Version headers it sent, the JSON-RPC method
// in its body).  Token values, client secrets and authorization codes are
// never printed.
//
// Usage: node ts_oauth_client.mjs URL --redirect-uri URI --mode auto|legacy|VERSION
//        [--call TOOL JSONARGS]... [--call-interval SECONDS] [--timeout SECONDS]
//
// --mode VERSION pins the client to that revision.  Exit status: 0 when the
// flow ran to the end, 1 on an error, 2 on the timeout (the summary says
// which), 3 when the installed SDK cannot be loaded.

import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { dirname, join } from 'node:path';

const PACKAGE = '@modelcontextprotocol/client';
const PACKAGE_DIR = join(dirname(fileURLToPath(import.meta.url)), 'node', 'node_modules', PACKAGE);

const summary = {
    error: null,
    sdk_version: null,
    mode: null,
    authorize_url_printed: false,
    first_connect: null,
    protocol_version: null,
    era: null,
    transport_protocol_version: null,
    session_id: null,
    server_version: null,
    tools: [],
    calls: [],
    requests: []
};

function emit(line) {
    process.stdout.write(line + '\n');
}

function finish(code) {
    emit('SUMMARY ' + JSON.stringify(summary));
    // Let stdout drain before leaving.
    process.stdout.write('', () => process.exit(code));
}

function parseArgs(argv) {
    const options = { url: null, redirectUri: null, mode: 'auto', calls: [], interval: 0, timeout: 60 };
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        if (arg === '--redirect-uri') options.redirectUri = argv[++i];
        else if (arg === '--mode') options.mode = argv[++i];
        else if (arg === '--call') {
            options.calls.push({ tool: argv[i + 1], arguments: JSON.parse(argv[i + 2]) });
            i += 2;
        } else if (arg === '--call-interval') options.interval = Number(argv[++i]);
        else if (arg === '--timeout') options.timeout = Number(argv[++i]);
        else if (options.url === null && !arg.startsWith('--')) options.url = arg;
        else throw new Error(`unexpected argument ${arg}`);
    }
    if (!options.url || !options.redirectUri) throw new Error('the URL and --redirect-uri are required');
    return options;
}

async function loadSdk() {
    const manifest = JSON.parse(readFileSync(join(PACKAGE_DIR, 'package.json'), 'utf8'));
    summary.sdk_version = manifest.version;
    const entry = manifest.exports['.'].import.default;
    return await import(pathToFileURL(join(PACKAGE_DIR, entry)).href);
}

// The first line written to stdin: the URL the browser was finally sent to.
function firstLine() {
    const lines = createInterface({ input: process.stdin });
    return new Promise((resolve, reject) => {
        lines.once('line', line => {
            resolve(line.trim());
            lines.close();
        });
        lines.once('close', () => reject(new Error('stdin closed before the redirect URL came')));
    });
}

// A fetch that notes every request, the OAuth ones included.
function recordingFetch() {
    return async (input, init) => {
        // Read without building a Request, which would take over a body stream.
        const given = input instanceof Request ? input : null;
        const url = new URL(given ? given.url : String(input));
        const headers = new Headers(init?.headers ?? given?.headers);
        let bodyMethod = null;
        let formKeys = null;
        const body = init?.body instanceof URLSearchParams ? init.body.toString() : init?.body;
        if (typeof body === 'string') {
            if ((headers.get('content-type') ?? '').includes('x-www-form-urlencoded')) {
                // An OAuth form: which fields were sent (not their values).
                formKeys = [...new Set(new URLSearchParams(body).keys())].sort();
            } else {
                try {
                    const message = JSON.parse(body);
                    bodyMethod = Array.isArray(message)
                        ? message.map(m => m.method ?? null)
                        : (message.method ?? null);
                } catch {
                    // not JSON-RPC
                }
            }
        }
        const authorization = headers.get('authorization') ?? '';
        const entry = {
            method: (init?.method ?? given?.method ?? 'GET').toUpperCase(),
            path: url.pathname,
            status: null,
            mcp_method: headers.get('mcp-method'),
            mcp_protocol_version: headers.get('mcp-protocol-version'),
            mcp_session_id: headers.has('mcp-session-id'),
            body_method: bodyMethod,
            bearer: authorization.toLowerCase().startsWith('bearer ')
        };
        if (formKeys) entry.form_keys = formKeys;
        summary.requests.push(entry);
        const response = await fetch(input, init);
        entry.status = response.status;
        entry.content_type = (response.headers.get('content-type') ?? '').split(';')[0];
        if (response.status >= 400 && url.pathname.endsWith('/mcp')) {
            // What the broker said when it refused (a 401's body is of no interest).
            entry.www_authenticate = response.headers.get('www-authenticate');
            if (response.status !== 401) entry.body = (await response.clone().text()).slice(0, 2000);
        }
        return response;
    };
}

class MemoryProvider {
    constructor(redirectUri) {
        this._redirectUri = redirectUri;
        this._client = undefined;
        this._tokens = undefined;
        this._verifier = undefined;
        this._state = `state-${process.pid}-${Date.now()}`;
        this.authorizeUrl = null;
        this.onAuthorize = null;
    }
    get redirectUrl() {
        return this._redirectUri;
    }
    get clientMetadata() {
        return {
            client_name: 'fjmcp test: TypeScript SDK client',
            redirect_uris: [this._redirectUri],
            grant_types: ['authorization_code', 'refresh_token'],
            response_types: ['code'],
            token_endpoint_auth_method: 'none'
        };
    }
    state() {
        return this._state;
    }
    clientInformation() {
        return this._client;
    }
    saveClientInformation(info) {
        this._client = info;
    }
    tokens() {
        return this._tokens;
    }
    saveTokens(tokens) {
        this._tokens = tokens;
    }
    redirectToAuthorization(url) {
        this.authorizeUrl = url;
        summary.authorize_url_printed = true;
        emit('AUTHORIZE ' + url.href);
    }
    saveCodeVerifier(verifier) {
        this._verifier = verifier;
    }
    codeVerifier() {
        if (!this._verifier) throw new Error('no PKCE code verifier saved');
        return this._verifier;
    }
}

function negotiation(mode) {
    if (mode === 'auto' || mode === 'legacy') return { mode };
    return { mode: { pin: mode } };
}

const sleep = seconds => new Promise(resolve => setTimeout(resolve, seconds * 1000));

function describe(error) {
    const text = `${error?.name ?? 'Error'}: ${error?.message ?? String(error)}`;
    const extra = {};
    for (const key of ['code', 'data', 'status']) {
        if (error && error[key] !== undefined) extra[key] = error[key];
    }
    return Object.keys(extra).length ? `${text} ${JSON.stringify(extra)}` : text;
}

async function run(options) {
    summary.mode = options.mode;
    const sdk = await loadSdk().catch(error => {
        summary.error = `cannot load ${PACKAGE}: ${describe(error)}`;
        finish(3);
        return new Promise(() => {});
    });
    const { Client, StreamableHTTPClientTransport, UnauthorizedError } = sdk;
    const provider = new MemoryProvider(options.redirectUri);
    const fetch = recordingFetch();
    const url = new URL(options.url);
    const connect = () => {
        const client = new Client(
            { name: 'fjmcp-ts-test', version: '1.0.0' },
            { versionNegotiation: negotiation(options.mode) }
        );
        const transport = new StreamableHTTPClientTransport(url, { authProvider: provider, fetch });
        return { client, transport };
    };

    // Unauthorized at first: the SDK discovers, registers, and sends the
    // user agent to the authorization URL.
    let { client, transport } = connect();
    try {
        await client.connect(transport);
        summary.first_connect = 'connected';
    } catch (error) {
        if (!(error instanceof UnauthorizedError)) throw error;
        summary.first_connect = describe(error);
    }
    if (summary.first_connect !== 'connected') {
        if (!provider.authorizeUrl) throw new Error('unauthorized, but no authorization URL was given');
        const back = new URL(await firstLine());
        if (back.searchParams.get('state') !== provider.state()) {
            throw new Error(`the state came back as ${back.searchParams.get('state')}`);
        }
        await transport.finishAuth(back.searchParams);
        await client.close().catch(() => {});
        ({ client, transport } = connect());
        await client.connect(transport);
    }
    summary.protocol_version = client.getNegotiatedProtocolVersion() ?? null;
    summary.era = client.getProtocolEra() ?? null;
    summary.transport_protocol_version = transport.protocolVersion ?? null;
    summary.session_id = transport.sessionId ?? null;
    summary.server_version = client.getServerVersion() ?? null;

    const listed = await client.listTools();
    summary.tools = listed.tools.map(t => t.name).sort();
    for (const [index, call] of options.calls.entries()) {
        if (index && options.interval) await sleep(options.interval);
        const result = await client.callTool({ name: call.tool, arguments: call.arguments });
        summary.calls.push({
            tool: call.tool,
            is_error: Boolean(result.isError),
            text: (result.content ?? []).filter(c => c.type === 'text').map(c => c.text),
            structured: result.structuredContent ?? null
        });
    }
    await client.close();
}

let options;
try {
    options = parseArgs(process.argv.slice(2));
} catch (error) {
    summary.error = describe(error);
    finish(1);
}
if (options) {
    const timer = setTimeout(() => {
        summary.error = `timed out after ${options.timeout} s`;
        finish(2);
    }, options.timeout * 1000);
    run(options).then(
        () => {
            clearTimeout(timer);
            finish(0);
        },
        error => {
            clearTimeout(timer);
            summary.error = describe(error);
            process.stderr.write(`${error?.stack ?? error}\n`);
            finish(1);
        }
    );
}
