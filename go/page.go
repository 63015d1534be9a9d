package main

// chatPage is the chat UI served at /: it streams from /v1/chat/completions
// and fills in the model's name from /v1/models (no server-side templating).
const chatPage = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>nanollama</title>
<style>
body{font-family:system-ui,sans-serif;max-width:760px;margin:0 auto;padding:1rem;background:#fafafa;color:#222}
h1{font-size:1.2rem} #log{display:flex;flex-direction:column;gap:.6rem;margin-bottom:1rem}
.msg{padding:.6rem .8rem;border-radius:.6rem;white-space:pre-wrap;line-height:1.4}
.user{background:#dbeafe;align-self:flex-end;max-width:85%} .assistant{background:#fff;border:1px solid #ddd;max-width:85%}
form{display:flex;gap:.5rem;position:sticky;bottom:0;background:#fafafa;padding:.5rem 0} textarea{flex:1;font:inherit;padding:.5rem;min-height:3rem}
button{font:inherit;padding:.5rem 1rem} .opts{font-size:.85rem;color:#555;margin:.5rem 0}
.opts input{width:4rem} #stats{font-size:.8rem;color:#777}
</style></head><body>
<h1>nanollama · <span id="model"></span></h1>
<div id="log"></div>
<form id="f"><textarea id="q" placeholder="Say something… (Enter to send, Shift+Enter for a new line)"></textarea><button id="send">Send</button><button type="button" id="stop" disabled>Stop</button></form>
<div class="opts">temperature <input id="temp" value="0.8"> top-p <input id="topp" value="0.9"> top-k <input id="topk" value="50"> max tokens <input id="maxt" value="256">
<button type="button" id="clear">Clear</button></div>
<div id="stats"></div>
<script>
const log = document.getElementById('log'), q = document.getElementById('q'), stats = document.getElementById('stats');
let messages = [];
function add(role, text) { const d = document.createElement('div'); d.className = 'msg ' + role; d.textContent = text; log.appendChild(d); d.scrollIntoView(); return d; }
document.getElementById('clear').onclick = () => { messages = []; log.innerHTML = ''; };
q.addEventListener('keydown', e => { if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); document.getElementById('f').requestSubmit(); } });
const stopBtn = document.getElementById('stop');
// With --api-key the page asks for the key once and keeps it in this browser.
const authHeaders = () => localStorage.apiKey ? {'Authorization': 'Bearer ' + localStorage.apiKey} : {};
fetch('/v1/models', {headers: authHeaders()}).then(r => r.json()).then(j => { const m = j.data[0].id; document.getElementById('model').textContent = m; document.title = 'nanollama · ' + m; }).catch(() => {});
document.getElementById('f').onsubmit = async e => {
  e.preventDefault();
  const text = q.value.trim(); if (!text) return;
  q.value = ''; add('user', text); messages.push({role: 'user', content: text});
  const out = add('assistant', ''); const t0 = performance.now(); let n = 0;
  const body = {messages, stream: true, stream_options: {include_usage: true},
    temperature: +document.getElementById('temp').value,
    top_p: +document.getElementById('topp').value, top_k: +document.getElementById('topk').value,
    max_tokens: +document.getElementById('maxt').value};
  const ctl = new AbortController(); stopBtn.disabled = false; stopBtn.onclick = () => ctl.abort();
  try {
    // authHeaders() is read at each call, so the retry sends the new key.
    const post = () => fetch('/v1/chat/completions', {method: 'POST', signal: ctl.signal,
      headers: {'Content-Type': 'application/json', ...authHeaders()}, body: JSON.stringify(body)});
    let res = await post();
    if (res.status === 401) {
      localStorage.apiKey = prompt('API key') || '';
      res = await post();
    }
    if (!res.ok) { out.textContent = 'error: ' + (await res.json()).error.message; return; }
    const reader = res.body.getReader(), dec = new TextDecoder(); let buf = '';
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const line = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6); if (data === '[DONE]') continue;
        const ev = JSON.parse(data);
        if (ev.error) { out.textContent += '\n[error: ' + ev.error.message + ']'; continue; }
        const c = ev.choices[0];
        if (c && c.delta && c.delta.content) { out.textContent += c.delta.content; n++; out.scrollIntoView(); }
        if (ev.usage) n = ev.usage.completion_tokens;
      }
    }
  } catch (err) {
    out.textContent += err.name === 'AbortError' ? ' [stopped]' : '\n[error: ' + err + ']';
  } finally { stopBtn.disabled = true; }
  messages.push({role: 'assistant', content: out.textContent});
  const s = (performance.now() - t0) / 1000; stats.textContent = n + ' tokens in ' + s.toFixed(2) + 's (' + (n / s).toFixed(1) + ' tok/s)';
};
</script></body></html>
`
