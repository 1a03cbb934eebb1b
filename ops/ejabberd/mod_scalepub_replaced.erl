%% Holds a new session's bind until every older session of the same full JID has ended.
%%
%% Why, in ejabberd 23.01 (docs/reliability.md §5, "The fencing argument", point 4): every owner
%% of a scalepub shard logs in with the same full JID, so a new owner's bind replaces the old
%% owner's session. ejabberd_sm:open_session/6 (check_existing_resources/3) only sends the old
%% session's c2s process `replaced` and returns; the bind result goes out at once. The old
%% process first handles what is ahead of `replaced` in its mailbox: the stanzas it had already
%% parsed from its socket (xmpp_socket:parse/2 queues a whole TCP read as messages to itself).
%% A publish IQ is executed in the sender's own c2s process (mod_pubsub's route has the local
%% hint {apply, mod_pubsub, route}: ejabberd_router:do_route/2 calls it in the caller on the
%% route's node; process_pubsub and the notifications to subscribers run there too), so the old
%% owner's queued publishes could be handled after the new owner's first publish.
%%
%% This module runs in the new session's c2s process, in the c2s_session_opened hook: after
%% open_session (the older sessions have been sent `replaced`), before the bind result is sent
%% and before the process reads anything more of its stream. It monitors the pids of the older
%% sessions (on any cluster node: ejabberd_sm's table is cluster-wide and monitors work on
%% remote pids) and waits for their 'DOWN', at most wait_ms (then it logs a warning and lets the
%% session go on). A process that is down handles nothing more, so nothing of the old session
%% is published after the new session's first stanza.
%%
%% Built by ops/stack (erlc, no ejabberd headers needed) like mod_scalepub_purge.
-module(mod_scalepub_replaced).
%% A gen_mod module (no -behaviour attribute: erlc here does not see ejabberd's beams).

-export([start/2, stop/1, reload/3, depends/2, mod_options/1, mod_opt_type/1, mod_doc/0]).
-export([session_opened/1]).

%% Before every other c2s_session_opened hook (mod_carboncopy's is 50): nothing of the new
%% session should run before the older ones ended.
-define(PRIORITY, 10).

start(Host, _Opts) ->
    ejabberd_hooks:add(c2s_session_opened, Host, ?MODULE, session_opened, ?PRIORITY).

stop(Host) ->
    ejabberd_hooks:delete(c2s_session_opened, Host, ?MODULE, session_opened, ?PRIORITY).

reload(_Host, _NewOpts, _OldOpts) -> ok.

depends(_Host, _Opts) -> [].

%% wait_ms: the longest a bind waits for the older sessions to end; 0 turns the wait off.
mod_options(_Host) -> [{wait_ms, 5000}].

mod_opt_type(wait_ms) -> econf:non_neg_int().

mod_doc() -> #{desc => ["Holds a bind until the older sessions of the same full JID have ended."]}.

%% The c2s_session_opened hook (a fold over the c2s state, returned unchanged).
session_opened(#{user := User, server := Server, resource := Resource, sid := Own,
                 lserver := LServer} = State) ->
    case gen_mod:get_module_opt(LServer, ?MODULE, wait_ms) of
        0 -> ok;
        WaitMs -> await_older(User, Server, Resource, Own, WaitMs)
    end,
    State;
session_opened(State) ->
    State.

await_older(User, Server, Resource, Own, WaitMs) ->
    case older_pids(ejabberd_sm:get_session_sids(User, Server, Resource), Own) of
        [] ->
            ok;
        Pids ->
            Started = erlang:monotonic_time(millisecond),
            Left = await(monitor_all(Pids), Started + WaitMs),
            log(jid:encode(jid:make(User, Server, Resource)), length(Pids), Left,
                erlang:monotonic_time(millisecond) - Started)
    end.

%% The sessions check_existing_resources/3 sent `replaced`: every one but the newest. When ours
%% is not the newest (a later login already replaces it), there is nothing to wait for.
older_pids(SIDs, Own) ->
    case lists:max([Own | SIDs]) of
        Own -> [Pid || {_, Pid} = SID <- SIDs, SID /= Own, Pid /= self()];
        _ -> []
    end.

monitor_all(Pids) ->
    [erlang:monitor(process, Pid) || Pid <- Pids].

%% A selective receive: the rest of the mailbox (the session's next stanzas) stays queued.
await([], _Deadline) ->
    [];
await([Ref | Rest] = Refs, Deadline) ->
    Timeout = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {'DOWN', Ref, process, _, _} -> await(Rest, Deadline)
    after Timeout ->
        lists:foreach(fun(R) -> erlang:demonitor(R, [flush]) end, Refs),
        Refs
    end.

log(JID, Count, [], Ms) ->
    logger:info("mod_scalepub_replaced: ~ts: waited ~B ms for ~B older session(s) to end",
                [JID, Ms, Count]);
log(JID, Count, Left, Ms) ->
    logger:warning("mod_scalepub_replaced: ~ts: ~B of ~B older session(s) still running after "
                   "~B ms; the new session goes on (their queued stanzas may follow its own)",
                   [JID, length(Left), Count, Ms]).
