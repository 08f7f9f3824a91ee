// JWT verification in nginx's njs (Debian's libnginx-mod-http-js, njs
// 0.7.9): the nginx side of scripts/bench-security.sh, doing what the
// forwarder's auth.jwt does for each request: the algorithm pinned, the
// signature checked, then exp (with leeway), nbf, iss, aud and sub.
// bench-security.sh replaces @SECRET@ (the HS256 shared secret, the same
// bytes as the forwarder's secret_file), @ES256_SPKI@ (the P-256 public key,
// base64 DER), @ISSUER@ and @AUDIENCE@.
//
// HS256 runs synchronously in js_set; ES256 needs crypto.subtle, which is
// asynchronous, so it runs in js_content behind auth_request (a subrequest
// per request). njs keeps no state between requests, so the public key is
// imported for every request and no verified-token cache is possible here.
var hmac = require('crypto').createHmac;  // the global `crypto` is WebCrypto

var SECRET = '@SECRET@';
var ES256_SPKI = '@ES256_SPKI@';
var ISSUER = '@ISSUER@';
var AUDIENCE = '@AUDIENCE@';
var LEEWAY = 30;

function bearer(r) {
    var h = r.headersIn.Authorization || '';
    if (h.length < 8 || h.substring(0, 7).toLowerCase() !== 'bearer ') {
        return null;
    }
    var parts = h.substring(7).trim().split('.');
    return parts.length === 3 ? parts : null;
}

function json(b64) {
    try {
        return JSON.parse(Buffer.from(b64, 'base64url').toString());
    } catch (e) {
        return null;
    }
}

// The claims checks, after a good signature.
function claims_ok(payload) {
    var c = json(payload);
    if (!c) {
        return false;
    }
    var now = Math.floor(Date.now() / 1000);
    if (typeof c.exp !== 'number' || now > c.exp + LEEWAY) {
        return false;
    }
    if (c.nbf !== undefined && (typeof c.nbf !== 'number' || c.nbf > now + LEEWAY)) {
        return false;
    }
    if (c.iss !== ISSUER) {
        return false;
    }
    var aud = Array.isArray(c.aud) ? c.aud : [c.aud];
    if (aud.indexOf(AUDIENCE) < 0) {
        return false;
    }
    return typeof c.sub === 'string' && c.sub.length > 0;
}

function header_alg_is(b64, alg) {
    var h = json(b64);
    return h !== null && h.alg === alg && h.crit === undefined;
}

// js_set $jwt_hs256: "ok" or "" (njs has no constant-time compare; the
// forwarder's jsonwebtoken compares MACs in constant time).
function hs256(r) {
    var p = bearer(r);
    if (!p || !header_alg_is(p[0], 'HS256')) {
        return '';
    }
    var mac = hmac('sha256', SECRET).update(p[0] + '.' + p[1]).digest('base64url');
    return mac === p[2] && claims_ok(p[1]) ? 'ok' : '';
}

// js_content of the auth_request location: 204 or 401.
async function es256(r) {
    var p = bearer(r);
    if (!p || !header_alg_is(p[0], 'ES256')) {
        r.return(401);
        return;
    }
    try {
        var key = await crypto.subtle.importKey('spki', Buffer.from(ES256_SPKI, 'base64'),
            {name: 'ECDSA', namedCurve: 'P-256'}, false, ['verify']);
        var ok = await crypto.subtle.verify({name: 'ECDSA', hash: 'SHA-256'}, key,
            Buffer.from(p[2], 'base64url'), p[0] + '.' + p[1]);
        r.return(ok && claims_ok(p[1]) ? 204 : 401);
    } catch (e) {
        r.return(401);
    }
}

export default {hs256, es256};
